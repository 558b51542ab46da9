"""`receive --engine dcmtk`: storescp into staging/, getdcmtags into incoming/.

`engine` supervises storescp, `staging` reads its log to know when a file is complete and
who sent it, `publisher` feeds finished files to long-lived getdcmtags processes, and
`completeness` checks a file nobody saw finish, element by element.
"""
