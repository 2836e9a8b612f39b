"""A TCP relay on 127.0.0.1 that holds every byte a client sends for DELAY_MS before passing it
on (answers go back at once): an upstream one round trip of DELAY_MS away, as a real binary cache
is, for benchmarks that must stay on loopback.
Usage: delay_proxy.py PORT UPSTREAM_PORT DELAY_MS"""
import asyncio
import sys


async def relay(reader, writer, delay):
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue()

    async def read():
        while True:
            data = await reader.read(1 << 16)
            await queue.put((loop.time() + delay, data))
            if not data:
                return

    async def write():
        while True:
            due, data = await queue.get()
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            if not data:
                writer.close()
                return
            writer.write(data)
            await writer.drain()

    try:
        await asyncio.gather(read(), write())
    except (ConnectionError, asyncio.CancelledError):
        writer.close()


async def main(port, upstream_port, delay):
    async def client(c_reader, c_writer):
        try:
            u_reader, u_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        except OSError:
            c_writer.close()
            return
        await asyncio.gather(relay(c_reader, u_writer, delay), relay(u_reader, c_writer, 0),
                             return_exceptions=True)

    server = await asyncio.start_server(client, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) / 1000))
