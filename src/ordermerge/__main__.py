from ordermerge.cli import main

main()
