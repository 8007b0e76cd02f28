"""The administration commands of `replistate`: ops, watch and schema.

They read and change operations from outside any replica: the rows through
PostgreSQL, the live changes and cancel requests through NATS. `replistate.cli`
parses the command line and calls these modules:

- `command`: exit codes, one-line errors, and the event loop a command runs in;
- `connections`: server URLs, reachability checks, and connecting to store and bus;
- `redact`: passwords and tokens hidden from the URLs and errors printed;
- `render`: progress bars, tables and JSON documents, with control characters
  escaped;
- `ops`: `ops list`, `ops show` (with `--follow`) and `ops cancel`;
- `watch`: decoded bus events as they arrive;
- `schema`: the SQL of the table, printed or applied.
"""
