from agent.cli import main

if __name__ == "__main__":  # multiprocessing's spawn imports this module in the reader process
    raise SystemExit(main())
