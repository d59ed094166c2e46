"""The node agent's host side: kernel networking (pyroute2, nftables) and the agent core."""
