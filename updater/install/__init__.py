"""Installing a list as validrcptto.cdb: the per-domain gate (``gate``, pure), the live
list's record beside the cdb (``liverecord``), the verdict both install paths share
(``verdict``), the cdb file itself (``stablecdb``: the canonical writer and the rewrite
that keeps records in place), what changed (``cdbdiff``), build locks (``lock``) and the
atomic install (``installer``)."""
