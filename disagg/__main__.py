from disagg.tools.cli import main

main()
