"""The k-vswitch CNI plugin.

Kept empty on purpose: the runtime execs the plugin for every pod, and the entry point
(:mod:`kvswitch.cni.main`) must import nothing beyond the standard library on its fast path.
"""
