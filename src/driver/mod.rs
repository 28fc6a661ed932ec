//! Driving machines: the backdoor shell, machine operations, the control socket.
