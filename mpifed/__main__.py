from mpifed.cli import main

main()
