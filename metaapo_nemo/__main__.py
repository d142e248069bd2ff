from metaapo_nemo.cli import main

raise SystemExit(main())
