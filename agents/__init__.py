"""faust agents: thin glue that decodes events, calls the pure core and produces results."""
