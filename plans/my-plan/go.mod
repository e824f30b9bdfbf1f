module my-plan

go 1.16

require github.com/testground/sdk-go v0.3.0
