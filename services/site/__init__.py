"""The site runner, one per site (:func:`.app.create_site_app`, :class:`.runner.SiteRunner`)."""
