"""`python -m common.tiny`, as the README documents it: the tiny random-weight checkpoint the tests and the demo train (`common.fixtures.tiny`)."""

from common.fixtures.tiny import main

if __name__ == "__main__":
    main()
