// Package prewarmconformance runs containerd's snapshotter conformance suite
// (snapshots/testsuite.SnapshotterSuite) against the prewarm shim, through containerd's
// own proxy client (snapshots/proxy) over the shim's unix socket: exactly the path
// containerd takes for a [proxy_plugins] snapshotter.
//
// Every test of the suite gets a fresh `prewarm snapshotter` process on the test's root.
// The binary is PREWARM_BIN, else `prewarm` on PATH.  Build offline from Debian's sources:
//
//	GO111MODULE=off GOPROXY=off GOPATH=$PWD/tests/go:/usr/share/gocode \
//	  go test -C tests/go/src/prewarmconformance -count=1 .
//
// tests/test_snapshotter_conformance.py runs exactly this.
package prewarmconformance

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

func shimBinary() string {
	if bin := os.Getenv("PREWARM_BIN"); bin != "" {
		return bin
	}
	return "prewarm"
}

// newShim starts `prewarm snapshotter` on root and returns containerd's proxy client for it,
// with a close func that stops the process by its PID.
func newShim(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	socket := filepath.Join(root, "shim.sock")
	logPath := filepath.Join(root, "..", "shim.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, nil, err
	}
	cmd := exec.Command(shimBinary(), "snapshotter", "--address", socket, "--root", root, "--log-level", "debug")
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, nil, fmt.Errorf("start %s: %w", shimBinary(), err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	stop := func() error {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			logFile.Close()
			if err != nil {
				return fmt.Errorf("shim exited with %v (log %s)", err, logPath)
			}
			return nil
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
			logFile.Close()
			return fmt.Errorf("shim did not stop on SIGTERM within 20s (log %s)", logPath)
		}
	}

	// The socket appears once the server listens; a shim that dies first is an error.
	deadline := time.Now().Add(60 * time.Second)
	for {
		if _, err := os.Stat(socket); err == nil {
			break
		}
		select {
		case err := <-exited:
			logFile.Close()
			log, _ := os.ReadFile(logPath)
			return nil, nil, fmt.Errorf("shim exited before listening (%v): %s", err, log)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			_ = stop()
			return nil, nil, fmt.Errorf("shim did not create %s within 60s", socket)
		}
	}

	dialCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(dialCtx, socket,
		grpc.WithInsecure(),
		grpc.WithBlock(),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", addr)
		}),
	)
	if err != nil {
		_ = stop()
		return nil, nil, fmt.Errorf("dial %s: %w", socket, err)
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "prewarm")
	return sn, func() error {
		cerr := conn.Close()
		if err := stop(); err != nil {
			return err
		}
		return cerr
	}, nil
}

func TestPrewarmSnapshotterConformance(t *testing.T) {
	if os.Getuid() != 0 {
		t.Fatal("the conformance suite mounts overlays: run it as root")
	}
	testsuite.SnapshotterSuite(t, "Prewarm", newShim)
}
