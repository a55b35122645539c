"""A second OS process for test_breaker: reads commands on stdin, answers one JSON line each.

    call <payment_id>   → {"outcome": "ok"|<error class>, "half_open": bool}
    state               → {"state": <breaker state read from Redis>}
"""

import json
import sys

from worker.breaker import get_breaker
from worker.providers import get_neonomics
from worker.providers.errors import CircuitOpenError


def main() -> None:
    client = get_neonomics()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command, *args = line.split()
        if command == "call":
            try:
                status = client.get_payment_status(args[0]).transaction_status
                answer = {"outcome": "ok", "status": status}
            except CircuitOpenError as exc:
                answer = {"outcome": "CircuitOpenError", "half_open": exc.half_open}
            except Exception as exc:
                answer = {"outcome": type(exc).__name__}
        elif command == "state":
            answer = {"state": get_breaker("neonomics_pisp").current_state}
        else:
            break
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
