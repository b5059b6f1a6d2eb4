"""Who can get into a run: the ports its processes listen on, and whether a plain Dask client
(no TLS, no credentials) is answered there."""

from __future__ import annotations


def listening_beyond_loopback(process) -> set[str]:
    """``host:port`` of every TCP socket ``process`` listens on that another machine could reach."""
    import socket

    import psutil

    host = socket.gethostbyname(socket.gethostname())
    found = set()
    for connection in process.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and not connection.laddr.ip.startswith(("127.", "::1")):
            ip = host if connection.laddr.ip in ("0.0.0.0", "::") else connection.laddr.ip
            found.add(f"{ip}:{connection.laddr.port}")
    return found


def plain_client_gets_in(address: str) -> bool:
    """Whether a plain Dask client (no TLS, no credentials) at ``address`` is answered: a scheduler
    runs what it submits, a worker tells who it is."""
    import asyncio

    from distributed import Client
    from distributed.comm import connect

    async def identity() -> dict:
        comm = await connect(f"tcp://{address}", timeout=5)
        try:
            await comm.write({"op": "identity", "reply": True})
            return await asyncio.wait_for(comm.read(), 5)
        finally:
            comm.abort()

    try:
        answer = asyncio.run(identity())
    except Exception:  # refused: no TLS handshake, no answer
        return False
    if answer.get("type") == "Scheduler":
        with Client(f"tcp://{address}", timeout=5) as client:
            return client.submit(lambda: "ran as the run's user").result(timeout=30) == "ran as the run's user"
    return bool(answer)
