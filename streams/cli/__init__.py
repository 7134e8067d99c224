"""The ``casestream`` command line (``python -m streams.cli``), one module per command group.

* ``main`` -- :func:`build_parser` (every command, in the order ``--help``
  lists them) and :func:`main` (settings, errors to exit codes);
* ``common`` -- the parent parsers of the common options (``--tenant``,
  ``--timeout``, ``--json``) and the argument helpers the commands share;
* ``services`` -- ``services up|down|status`` (the local engines);
* ``topics`` -- ``topics create``, ``db migrate``;
* ``worker`` -- ``worker`` (the Faust worker of a tenant);
* ``messages`` -- ``send``, ``tail``;
* ``query`` -- ``case show``, ``search``, ``analytics``;
* ``api`` -- ``api`` (the HTTP service);
* ``replay`` -- ``replay``, ``reindex``;
* ``dlq`` -- ``dlq list|show|replay``;
* ``oncall`` -- ``oncall check|who``;
* ``integrations`` -- ``integrations create|list|rotate|revoke``;
* ``demo`` -- ``demo``.

Allowed imports: anything of the project; nothing but the tests imports
the CLI (the demo and the DLQ tools share its helpers through
``streams.console``, ``streams.messages`` and ``streams.kafka``, where
every Kafka client is built). A command imports its heavy libraries
(Faust, aiohttp, asyncpg, Elasticsearch, the engines) inside its function,
so ``casestream --help`` and the light commands start fast.
"""

from streams.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
