"""``python -m broker.embedded``: the embedded broker configured from command-line options."""

from broker.embedded.amqtt_broker import main

raise SystemExit(main())
