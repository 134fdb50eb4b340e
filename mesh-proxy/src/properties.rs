//! Property tests of every parser that reads network or operator input:
//! whatever the bytes, no panic and no unbounded allocation.
