"""Building the list: qmail's own files (``qmail``), the delivery chain for a domain
(``routing`` over ``localdelivery`` and ``dotqmail``, pure), the sources a domain's keys
come from (``sources/``: the qmail tree, vpopmail, MySQL, LDAP / AD), what a build read
(``inputs``), the keys merged into one list (``merge``), and ``generate``, which runs
them."""
