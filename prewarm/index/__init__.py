"""Index: a gzip layer in, its zTOC (span checkpoints and tar TOC) out.

Reads an image's SOCI index from the registry (:mod:`.soci`) or builds a zTOC byte for
byte as soci does (:mod:`.ztoc_build`, :mod:`.zran`, :mod:`.tarindex`; to a file in
flat memory through :mod:`.ztoc_spool`); decodes and checks it (:mod:`.ztoc`).
:mod:`.inflate` inflates one span from its checkpoint.  Hands on the spans the fleet
plans tasks from and the TOC the store lands files by.
"""
