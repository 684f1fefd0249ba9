//! TODO(C1)
