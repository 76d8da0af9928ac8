from kms_agent.cli import main

main()
