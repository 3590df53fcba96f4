// placeholder: the browser client is being written (issue 5)
