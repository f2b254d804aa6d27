//! swtpm instances for the TPM suites: each on free loopback ports with its own
//! state directory, stopped (or power-cycled) by the test.
