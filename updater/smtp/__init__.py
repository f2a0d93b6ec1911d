"""The SMTP side: the qmail-smtpd protocol core and its front ends."""
