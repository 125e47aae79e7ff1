"""Runs one bench case in a fresh process (CPU peak RSS) and prints its row as JSON."""

import json
import sys

from .harness import ROW_TAG, _suite, measure


def main(argv: list[str]) -> None:
    suite, index, device = argv[0], int(argv[1]), argv[2]
    case = _suite(suite).cases(device, quick="--quick" in argv)[index]
    print(ROW_TAG + json.dumps(measure(case, device)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
