"""One file per attribution method, beside a base and the protocol the run offers them."""
