"""tcptunnel: a reverse TCP tunnel (Gateway, Proxy-Server, Proxy-Client) on Twisted."""

__version__ = "0.1.0"
