"""The one kernel layer: rtnetlink, network namespaces and the few ioctls k-vswitch needs.

Used by the node agent's host setup (:mod:`kvswitch.node.host`) and by the CNI plugin
(:mod:`kvswitch.cni.netlink` maps its errors to CNI codes). Standard library only, and cheap to
import, because the CNI plugin's in-process fallback loads it on every call.

* :mod:`kvswitch.kernel.netns` -- ``NETNS_DIR``, :func:`netns_path`, the setns(2) thread helper;
* :mod:`kvswitch.kernel.rtnl` -- a blocking rtnetlink client over a raw socket;
* :mod:`kvswitch.kernel.host` -- idempotent ``ensure_*`` verbs for a node's host networking;
* :mod:`kvswitch.kernel.ethtool` -- the one ethtool ioctl (tx checksum offload off).
"""
