from hoshikage_sd.cli import main

raise SystemExit(main())
