from tailgate.cli import main

main()
