"""Web framework integrations. Each module imports its framework, so import the
one you use: `replistate.integrations.aiohttp`."""
