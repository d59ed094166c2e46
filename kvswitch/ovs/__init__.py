"""Open vSwitch access: ovsdb (IDL), flow models, and the OpenFlow reconciler."""
