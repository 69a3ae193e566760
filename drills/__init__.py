"""Fault drills: real ``queue-runtime worker`` processes on an SQS FIFO queue (a stricter moto
server), with workers killed, the broker frozen, calls slowed, dropped and throttled; every
``handle()`` call recorded and checked per message group for loss, gaps and overlap.

``python -m drills.faults --rounds N`` (or ``python -m drills``) runs them; `drills.proxy` is
the HTTP fault proxy they put between the workers and the server; `drills.moto` the server.
"""
