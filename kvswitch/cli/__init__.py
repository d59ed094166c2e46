"""kvswitchctl's operator commands (trace, flows, policy), each registered through the
``kvswitchctl.commands`` entry-point group (pyproject.toml). See docs/observability.md."""
