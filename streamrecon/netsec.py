"""ZeroMQ CURVE helpers for clients of the node (torch-free)."""

from __future__ import annotations

__all__ = ["curve_client"]


def curve_client(sock, server_public: str, client_secret: str) -> None:
    """Make ``sock`` a CURVE client: the node's public key file and this client's secret key file
    (both as written by ``zmq.auth.create_certificates``)."""
    import zmq.auth

    server_key, _ = zmq.auth.load_certificate(server_public)
    public, secret = zmq.auth.load_certificate(client_secret)
    if secret is None:
        raise ValueError(f"{client_secret} holds no secret key")
    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_key, public, secret
