//! SoftHSM2 tokens for the PKCS#11 suites: each test gets its own SOFTHSM2_CONF
//! and token directory; no global state is touched.
