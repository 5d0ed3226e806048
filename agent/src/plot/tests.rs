//! Tests of the plots.
