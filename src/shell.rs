//! POSIX shell quoting: the only place that makes shell words.
