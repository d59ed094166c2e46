"""The node agent's host side: host networking (over kvswitch.kernel; nftables) and the agent core."""
