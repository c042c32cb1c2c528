"""Built-in load-balancing strategies, registered under the `bascule.strategies`
entry-point group like any third-party one."""
