from disagg.tools.launch import main

main()
