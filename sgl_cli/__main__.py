from sgl_cli.cli import main

main()
