pub mod h2authority;
