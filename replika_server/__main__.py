from replika_server.cli import main

raise SystemExit(main())
