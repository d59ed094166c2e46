"""The CNI plugin's contract with the agent, the runtime and the node: names, paths, ovsdb keys.

Standard library only, and no import at module level: the thin ``k-vswitch-cni`` entry point
loads it on every exec. Everything that must agree between the plugin, the agent and the chart is
defined here once; every other module imports it from here.
"""

from __future__ import annotations

# --- names the runtime and the chart see ---------------------------------------------------------
PLUGIN_NAME = "k-vswitch-cni"  # the executable in the CNI bin dir and the conflist's plugin "type"
NETWORK_NAME = "k-vswitch"  # the conflist's network name
CONFLIST_NAME = "10-k-vswitch.conflist"
# 1.0.0, not 1.1.0: the portmap/bandwidth plugins distributions ship (e.g. Debian's 1.1.1) refuse
# 1.1.0 configs, and a chain runs at the version every plugin supports.
CONFLIST_VERSION = "1.0.0"

# --- default paths on a node ---------------------------------------------------------------------
DEFAULT_SERVER_SOCKET = "/var/run/k-vswitch/cni.sock"  # the agent's CNI server
DEFAULT_OVSDB_SOCKET = "unix:/var/run/openvswitch/db.sock"
DEFAULT_BRIDGE = "k-vswitch0"
DEFAULT_CNI_CONF_DIR = "/etc/cni/net.d"
DEFAULT_CNI_BIN_DIR = "/opt/cni/bin"

# --- external_ids of the OVS Port of every attachment (the agent and GC find pods by these) ------
ID_OWNER = "owner"  # = PLUGIN_NAME on ports the plugin made
ID_NETWORK = "cni-network"
ID_CONTAINER = "container-id"
ID_IFNAME = "ifname"
ID_NETNS = "netns"
ID_POD_NAMESPACE = "pod-namespace"
ID_POD_NAME = "pod-name"
ID_POD_UID = "pod-uid"
ID_IP = "ip"  # comma-separated CIDRs of the pod interface
ID_MAC = "mac"

# --- the host end of the veth --------------------------------------------------------------------
HOST_IF_PREFIX = "kv"
LINK_ALIAS_PREFIX = "k-vswitch-cni"  # IFLA_IFALIAS of host veths: "<prefix> <network> <id> <ifname>"


def host_ifname(network: str, container_id: str, ifname: str) -> str:
    """Deterministic host-side veth name (14 characters) so DEL and GC can find it without state."""
    import hashlib

    digest = hashlib.sha256(f"{network}\0{container_id}\0{ifname}".encode()).hexdigest()
    return HOST_IF_PREFIX + digest[:12]


def link_alias(network: str, container_id: str, ifname: str) -> str:
    """What GC lists to find the attachments of a network that the runtime no longer knows."""
    return f"{LINK_ALIAS_PREFIX} {network} {container_id} {ifname}"


# --- MTU: bytes each encapsulation adds (outer Ethernet + IP + header) ---------------------------
OVERLAY_OVERHEAD = {"vxlan": 50, "geneve": 50, "gre": 42, "none": 0}
