"""``qmail-updater run``: the typed events and actions (``events``), every timing rule
and decision (``rules``, pure, clock passed in), what is kept between builds
(``incremental``'s snapshot), the edges that turn the world into events (``fifo``,
``watch``, ``directorypoll``) and the driver that carries the actions out (``driver``);
the status file it writes and ``status`` reads (``status``, ``locate``)."""
