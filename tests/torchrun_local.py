"""torchrun, with its rendezvous listening on 127.0.0.1 alone, on a free port it picks itself.

    python tests/torchrun_local.py --nproc_per_node 2 train.py config.yaml ...

The tests' servers listen on loopback only. torchrun's rendezvous store (a TCPStore in the launcher)
binds every interface whatever --master_addr says, but a TCPStore can be handed a socket that already
listens (master_listen_fd): this wraps the one place torchrun's static rendezvous makes its store, to
pass one bound to 127.0.0.1. The workers' own gloo sockets stay on loopback by GLOO_SOCKET_IFNAME=lo.
Everything else is torchrun itself (torch.distributed.run.main).
"""

import os
import socket
import sys

from torch.distributed.elastic.rendezvous import static_tcp_rendezvous
from torch.distributed.run import main

listener = socket.create_server(("127.0.0.1", 0))  # a free port, held from now on: no one else can take it
TCPStore = static_tcp_rendezvous.TCPStore


def loopback_store(host, port, world_size, is_master, *args, **kwargs):
    if is_master:
        kwargs["master_listen_fd"] = listener.detach()
    return TCPStore(host, port, world_size, is_master, *args, **kwargs)


if __name__ == "__main__":
    static_tcp_rendezvous.TCPStore = loopback_store
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # inherited by the workers
    port = str(listener.getsockname()[1])
    sys.exit(main(["--master_addr", "127.0.0.1", "--master_port", port, *sys.argv[1:]]))
