fn main() { println!("{}", patroxy::EBPF_OBJECT.len()); }
