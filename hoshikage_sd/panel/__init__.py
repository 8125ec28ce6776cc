"""星影パネル, the web panel: one page the router serves on its own port (/panel/).

`serve` answers /panel/ (the page: `static/`, plain HTML, CSS and JavaScript, nothing fetched
from elsewhere) and its data under /panel/api/: the state (commands/facts.gather, what
`status --json` prints), journal records, and the actions load, unload and pin. `guard` holds
the pure checks (cross-site requests, loopback, input), `journal` reads hoshikage's records.

The panel never starts a model by looking and never counts as a model's activity: its
requests do not touch the router's idle clock or its request counters, so an open panel
neither keeps a model loaded nor keeps the router up (README "Panel").
"""
