//! QEMU arguments for one machine, from small pure functions.
