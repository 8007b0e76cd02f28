"""The administration commands of `replistate`: ops, watch and schema.

They read and change operations from outside any replica: the rows through
PostgreSQL, the live changes and cancel requests through NATS. `replistate.cli`
parses the command line and calls these modules:

- `command`: exit codes, one-line errors, and the event loop a command runs in;
- `connect`: server URLs, reachability checks, and connecting to store and bus;
- `render`: progress bars, tables and JSON documents;
- `ops`: `ops list`, `ops show` (with `--follow`) and `ops cancel`;
- `watch`: decoded bus events as they arrive;
- `schema`: the SQL of the table, printed or applied.
"""
